"""`python -m backend.train`: trains the embedded tiny-shapes model (see backend/embedded/train.py)."""
import backend  # noqa: F401  (OpenBLAS before mlx)

from backend.embedded.train import main

if __name__ == "__main__":
    main()
