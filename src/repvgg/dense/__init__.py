"""What the dense tasks (segmentation, detection) share: generated scenes, and the engine hooks of a dense task."""
