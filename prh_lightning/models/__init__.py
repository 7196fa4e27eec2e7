"""Models used by the recipes (FashionCNN, grayscale ResNet) and offline pretrained loaders."""
