"""``python -m degeneracy`` runs the command line."""

from degeneracy.commands import app

app()
