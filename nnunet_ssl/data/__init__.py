"""nnU-Net-aware data plumbing: unlabeled discovery, preprocessing, loading."""
