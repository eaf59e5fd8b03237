"""`python -m adaptloop.cli ...`: what `adaptloop` runs (the stack and the tests start services this way)."""

from adaptloop.cli import main

main()
