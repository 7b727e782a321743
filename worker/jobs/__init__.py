"""One module per job kind: a spec validator (torch-free) and a runner (imports torch inside)."""
