"""Rating files: their layouts and how they are read (rating_files), and MovieLens downloaded
on demand (download); dataloader.py makes users of them."""
