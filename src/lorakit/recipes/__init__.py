"""Ready-made end-to-end jobs built on the library: the quickstart and the comparison of configs."""
