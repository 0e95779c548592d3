"""Search drivers: they run Trainers with the suite's callbacks (callbacks never import this package)."""
