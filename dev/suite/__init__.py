"""The digits suite: real tasks from scikit-learn's digits on a small MLP, to merge and score."""
