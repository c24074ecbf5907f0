"""One module per component; each renders files, defines processes and probes health."""
