"""The functional API of every op (re-exported from fastnn.ops.<op>)."""
