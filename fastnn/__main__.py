"""python -m fastnn info"""
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] == "info":
        from fastnn.info import info
        info()
        return 0
    print("usage: python -m fastnn info", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
