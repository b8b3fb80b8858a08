"""``python -m cnnext`` prints what was built and what this machine offers."""

from cnnext import info

info()
