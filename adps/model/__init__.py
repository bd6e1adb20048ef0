"""Teacher/student backbones, Weight Mask Block, Post-Segmentation Module, the ADPS model, losses."""
