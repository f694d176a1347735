"""Reports: the one writer (markdown, HTML, PNG plots, result JSON), the training run report and `moelab compare`."""
