"""Reports: plots and Markdown tables of runs."""
