"""Cityscapes label colours and train IDs (from the official label table).

The one place the palette lives: the demo-data generator draws with it, evaluation decodes
colour label maps back to train IDs with it.
"""

import numpy as np

IGNORE_ID = 255

# name, trainId, (R, G, B). Classes that share a colour (the void ones, pole/polegroup) appear
# once. trainId 255 is ignored in evaluation.
LABELS = [
    ("unlabeled", IGNORE_ID, (0, 0, 0)),
    ("dynamic", IGNORE_ID, (111, 74, 0)),
    ("ground", IGNORE_ID, (81, 0, 81)),
    ("road", 0, (128, 64, 128)),
    ("sidewalk", 1, (244, 35, 232)),
    ("parking", IGNORE_ID, (250, 170, 160)),
    ("rail track", IGNORE_ID, (230, 150, 140)),
    ("building", 2, (70, 70, 70)),
    ("wall", 3, (102, 102, 156)),
    ("fence", 4, (190, 153, 153)),
    ("guard rail", IGNORE_ID, (180, 165, 180)),
    ("bridge", IGNORE_ID, (150, 100, 100)),
    ("tunnel", IGNORE_ID, (150, 120, 90)),
    ("pole", 5, (153, 153, 153)),
    ("traffic light", 6, (250, 170, 30)),
    ("traffic sign", 7, (220, 220, 0)),
    ("vegetation", 8, (107, 142, 35)),
    ("terrain", 9, (152, 251, 152)),
    ("sky", 10, (70, 130, 180)),
    ("person", 11, (220, 20, 60)),
    ("rider", 12, (255, 0, 0)),
    ("car", 13, (0, 0, 142)),
    ("truck", 14, (0, 0, 70)),
    ("bus", 15, (0, 60, 100)),
    ("caravan", IGNORE_ID, (0, 0, 90)),
    ("trailer", IGNORE_ID, (0, 0, 110)),
    ("train", 16, (0, 80, 100)),
    ("motorcycle", 17, (0, 0, 230)),
    ("bicycle", 18, (119, 11, 32)),
]

COLORS = {name: color for name, _, color in LABELS}
NUM_TRAIN_IDS = 19
TRAIN_ID_NAMES = {train_id: name for name, train_id, _ in LABELS if train_id != IGNORE_ID}
