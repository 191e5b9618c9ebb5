"""``python -m degeneracy`` runs the command line."""

from degeneracy.cli import app

app()
