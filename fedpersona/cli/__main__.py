"""``python -m fedpersona.cli``."""

from fedpersona.cli import main

main()
