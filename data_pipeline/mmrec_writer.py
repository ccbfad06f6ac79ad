"""Writes a data set in MMRec's folder format: `<name>.inter` + `<modality>_feat.npy`."""

import os
from typing import Dict, Optional

import numpy as np

TRAIN, VALID, TEST = 0, 1, 2


def write_mmrec(out_dir: str, name: str, user_ids: np.ndarray, item_ids: np.ndarray,
                split_labels: np.ndarray, features: Optional[Dict[str, np.ndarray]] = None) -> str:
  """Writes `<out_dir>/<name>.inter` (tab-separated userID, itemID, x_label) and features.

  split_labels: 0 train, 1 valid, 2 test (MMRec's `x_label`). features: modality name ->
  float32 [n_items, d], saved as `<modality>_feat.npy` (row k = item k). Returns out_dir.
  """
  os.makedirs(out_dir, exist_ok=True)
  user_ids, item_ids, split_labels = (np.asarray(a, np.int64) for a in (user_ids, item_ids, split_labels))
  if not (len(user_ids) == len(item_ids) == len(split_labels)):
    raise ValueError("user_ids, item_ids and split_labels must have the same length")
  table = np.stack([user_ids, item_ids, split_labels], axis=1)
  path = os.path.join(out_dir, f"{name}.inter")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write("userID\titemID\tx_label\n")
    np.savetxt(f, table, fmt="%d", delimiter="\t")
  os.replace(tmp, path)  # atomic: a killed write never leaves a half file behind
  for modality, matrix in (features or {}).items():
    feat_path = os.path.join(out_dir, f"{modality}_feat.npy")
    np.save(feat_path + ".tmp.npy", np.asarray(matrix, np.float32))
    os.replace(feat_path + ".tmp.npy", feat_path)
  return out_dir
