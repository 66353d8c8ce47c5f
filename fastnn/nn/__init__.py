"""Drop-in torch.nn modules backed by fastnn's kernels."""
