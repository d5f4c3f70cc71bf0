"""Reports people can look at."""
