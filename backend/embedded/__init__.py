"""The embedded tiny-shapes model: its data (dataset), how its images are judged (analysis), its evaluation."""
