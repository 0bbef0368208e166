"""Data: long-tailed CIFAR, on-device augmentation, CT manifests, MONAI preprocessing, the synthetic cohort."""
