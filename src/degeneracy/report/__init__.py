"""Figures and the demo report. Imports matplotlib lazily; the core never imports this package."""
