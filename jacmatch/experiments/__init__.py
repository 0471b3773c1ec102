"""Experiments and reports: the propositions checked, the paper's claims measured."""
