"""Reports of a cross-validated run: figures (matplotlib, Agg) and a Markdown + self-contained HTML report."""
