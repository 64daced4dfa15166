"""Tests for ldro.data.images (no network, no shared CIFAR folder)."""

import pathlib
import shutil

import numpy as np
import pytest

from ldro.data import images as images_lib

PIL_Image = pytest.importorskip("PIL.Image")

CLASSES = ("bird", "cat", "dog", "frog", "truck")  # Sorted: ids 0..4.
PAIRS = (("cat", "dog"), ("bird", "frog"))
N_TRAIN, N_TEST = 6, 3


def _write_folder(root: pathlib.Path, classes=CLASSES, n_train=N_TRAIN,
                  n_test=N_TEST, size=(32, 32)) -> pathlib.Path:
  """Writes root/{train,test}/<class>/<i>.jpg with near-constant colours."""
  for split, n in (("train", n_train), ("test", n_test)):
    for c, name in enumerate(classes):
      d = root / split / name
      d.mkdir(parents=True, exist_ok=True)
      for i in range(n):
        colour = (40 * c + 20, 10 * i, 255 - 40 * c)
        PIL_Image.new("RGB", size, colour).save(d / f"{i:04d}.jpg", quality=95)
  return root


def _make_data(n_per_task=(7, 3, 12), n_test=5, seed=0):
  """A small synthetic TaskImageData whose pixel 0 encodes the example id."""
  rng = np.random.default_rng(seed)
  tasks = np.concatenate([np.full(n, t) for t, n in enumerate(n_per_task)])
  rng.shuffle(tasks)
  m = len(tasks)
  train_images = np.zeros((m, 4, 4, 3), np.uint8)
  train_images[:, 0, 0, 0] = np.arange(m) % 256
  train_images[:, 0, 0, 1] = np.arange(m) // 256
  test_tasks = np.arange(n_test * len(n_per_task)) % len(n_per_task)
  return images_lib.TaskImageData(
      task_names=[f"t{i}" for i in range(len(n_per_task))],
      class_names=[f"c{i}" for i in range(2 * len(n_per_task))],
      train_images=train_images,
      train_labels=(2 * tasks + np.arange(m) % 2).astype(np.int32),
      train_tasks=tasks.astype(np.int32),
      test_images=rng.integers(0, 256, (len(test_tasks), 4, 4, 3), np.uint8),
      test_labels=(2 * test_tasks).astype(np.int32),
      test_tasks=test_tasks.astype(np.int32))


def _example_ids(batch_image: np.ndarray) -> np.ndarray:
  """Inverts the pixel encoding of `_make_data` after normalisation."""
  px = np.rint((batch_image[..., 0, 0, :2] + 0.5) * 255).astype(np.int64)
  return px[..., 0] + 256 * px[..., 1]


# ---------------------------------------------------------------- dataclass


def test_task_image_data_properties_and_validation():
  data = _make_data()
  assert data.num_tasks == 3 and data.num_classes == 6
  assert data.train_labels.dtype == np.int32

  kwargs = dataclass_kwargs(data)
  kwargs["train_labels"] = kwargs["train_labels"][:-1]
  with pytest.raises(ValueError, match="train_labels"):
    images_lib.TaskImageData(**kwargs)

  kwargs = dataclass_kwargs(data)
  kwargs["test_tasks"] = np.where(kwargs["test_tasks"] == 1, 0,
                                  kwargs["test_tasks"])
  with pytest.raises(ValueError, match=r"t1.*no test"):
    images_lib.TaskImageData(**kwargs)

  kwargs = dataclass_kwargs(data)
  kwargs["train_images"] = kwargs["train_images"].astype(np.float32)
  with pytest.raises(ValueError, match="uint8"):
    images_lib.TaskImageData(**kwargs)

  kwargs = dataclass_kwargs(data)
  kwargs["test_labels"] = kwargs["test_labels"] + 100
  with pytest.raises(ValueError, match="test_labels"):
    images_lib.TaskImageData(**kwargs)


def dataclass_kwargs(data):
  return {f: getattr(data, f) for f in
          images_lib.TaskImageData.__dataclass_fields__}


# ---------------------------------------------------------------- CIFAR-100


def test_load_cifar100_tasks_with_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=400):
    data = images_lib.load_cifar100_tasks(data_dir="/nonexistent/tfds")
  assert data.num_tasks == 20 and data.num_classes == 100
  assert len(set(data.task_names)) == 20
  for split in ("train", "test"):
    imgs = getattr(data, f"{split}_images")
    labels = getattr(data, f"{split}_labels")
    tasks = getattr(data, f"{split}_tasks")
    assert imgs.shape == (400, 32, 32, 3) and imgs.dtype == np.uint8
    assert labels.shape == tasks.shape == (400,)
    assert labels.dtype == tasks.dtype == np.int32
    assert 0 <= labels.min() and labels.max() < 100
    assert 0 <= tasks.min() and tasks.max() < 20
    assert imgs.std() > 0  # Real (random) pixels, not zeros.


# ---------------------------------------------------------------- ImageFolder


def test_load_imagefolder_pair_tasks_and_cache(tmp_path, monkeypatch):
  root = _write_folder(tmp_path / "imgs")
  cache = tmp_path / "cache"
  data = images_lib.load_imagefolder_pair_tasks(root, PAIRS, cache_dir=cache)

  assert data.task_names == ["cat/dog", "bird/frog"]
  assert data.class_names == list(CLASSES)  # All folders, even unpaired.
  for split, n in (("train", N_TRAIN), ("test", N_TEST)):
    imgs = getattr(data, f"{split}_images")
    labels = getattr(data, f"{split}_labels")
    tasks = getattr(data, f"{split}_tasks")
    assert imgs.shape == (4 * n, 32, 32, 3) and imgs.dtype == np.uint8
    for t, pair in enumerate(PAIRS):
      ids = [CLASSES.index(c) for c in pair]
      np.testing.assert_array_equal(np.sort(np.unique(labels[tasks == t])),
                                    ids)
      for c in ids:
        assert np.sum(labels == c) == n
    # Images really belong to their label (red channel encodes the class).
    red = imgs[..., 0].mean(axis=(1, 2))
    np.testing.assert_allclose(red, 40 * labels + 20, atol=4)

  cached = list(cache.glob("*.npz"))
  assert len(cached) == 1 and not list(cache.glob("*.tmp"))

  # A second load must hit the cache: make decoding impossible.
  def _fail(*args, **kwargs):
    raise AssertionError("cache miss")
  monkeypatch.setattr(images_lib, "_decode_image_folder", _fail)
  again = images_lib.load_imagefolder_pair_tasks(root, PAIRS, cache_dir=cache)
  for f in images_lib.TaskImageData.__dataclass_fields__:
    np.testing.assert_array_equal(getattr(again, f), getattr(data, f))

  # Other pairs reuse the same cache (it holds the whole folder).
  other = images_lib.load_imagefolder_pair_tasks(
      root, (("truck", "cat"),), cache_dir=cache)
  assert other.task_names == ["truck/cat"] and len(other.test_labels) == 6

  # Adding a file invalidates the cache.
  PIL_Image.new("RGB", (32, 32)).save(root / "train" / "cat" / "extra.jpg")
  with pytest.raises(AssertionError, match="cache miss"):
    images_lib.load_imagefolder_pair_tasks(root, PAIRS, cache_dir=cache)


def test_load_imagefolder_pair_tasks_without_cache(tmp_path):
  root = _write_folder(tmp_path / "imgs", classes=("a", "b"), n_train=2,
                       n_test=1)
  data = images_lib.load_imagefolder_pair_tasks(
      root, (("b", "a"),), cache_dir=tmp_path / "cache", use_cache=False)
  assert data.num_tasks == 1 and len(data.train_labels) == 4
  assert not (tmp_path / "cache").exists()


def test_load_imagefolder_pair_tasks_errors(tmp_path):
  missing = tmp_path / "missing"
  with pytest.raises(FileNotFoundError, match="missing"):
    images_lib.load_imagefolder_pair_tasks(missing, PAIRS, use_cache=False)

  no_test = tmp_path / "no_test"
  _write_folder(no_test, classes=("cat", "dog"), n_train=1, n_test=0)
  shutil.rmtree(no_test / "test")
  with pytest.raises(ValueError, match=r"'test' missing.*\['train'\]"):
    images_lib.load_imagefolder_pair_tasks(no_test, PAIRS[:1],
                                           use_cache=False)

  empty = tmp_path / "empty"
  for split in ("train", "test"):
    (empty / split / "cat").mkdir(parents=True)
    (empty / split / "cat" / "notes.txt").write_text("not an image")
  with pytest.raises(ValueError, match="No images"):
    images_lib.load_imagefolder_pair_tasks(empty, PAIRS[:1], use_cache=False)

  root = _write_folder(tmp_path / "imgs", classes=("cat", "dog"), n_train=1,
                       n_test=1)
  with pytest.raises(ValueError, match=r"horse.*\['cat', 'dog'\]"):
    images_lib.load_imagefolder_pair_tasks(root, (("cat", "horse"),),
                                           use_cache=False)
  with pytest.raises(ValueError, match="distinct"):
    images_lib.load_imagefolder_pair_tasks(root, (("cat", "cat"),),
                                           use_cache=False)

  # A class without test images is refused, naming the folder and its task.
  (root / "test" / "dog" / "0000.jpg").unlink()
  (root / "test" / "cat" / "0000.jpg").unlink()
  _write_folder(root, classes=("bird",), n_train=1, n_test=1)
  with pytest.raises(ValueError, match=r"test/cat.* has no images: class .cat. of task .cat/dog."):
    images_lib.load_imagefolder_pair_tasks(
        root, (("cat", "dog"), ("bird", "cat")), use_cache=False)


# ---------------------------------------------------------------- batching


def test_grouped_batcher_shapes_and_determinism():
  data = _make_data(n_per_task=(7, 3, 12))
  batcher = images_lib.GroupedBatcher(data, batch_size=10, seed=3)
  assert batcher.per_task_batch == 3 and batcher.num_tasks == 3
  assert batcher.steps_per_epoch == 4  # ceil(12 / 3).

  b5 = batcher.batch(5)
  assert b5["image"].shape == (3, 3, 4, 4, 3) and b5["image"].dtype == np.float32
  assert b5["label"].shape == (3, 3) and b5["label"].dtype == np.int32
  assert -0.5 <= b5["image"].min() and b5["image"].max() <= 0.5

  # Pure function of (seed, step): call order and instance do not matter.
  fresh = images_lib.GroupedBatcher(data, batch_size=10, seed=3)
  for step in (5, 0, 123, 5):
    for key in ("image", "label"):
      np.testing.assert_array_equal(fresh.batch(step)[key],
                                    batcher.batch(step)[key])
  other_seed = images_lib.GroupedBatcher(data, batch_size=10, seed=4)
  assert not np.array_equal(other_seed.batch(5)["image"], b5["image"])
  assert not np.array_equal(batcher.batch(6)["image"], b5["image"])

  # Each row only holds examples of its own task, with consistent labels.
  for step in range(10):
    b = batcher.batch(step)
    ids = _example_ids(b["image"])
    for task in range(3):
      np.testing.assert_array_equal(data.train_tasks[ids[task]], task)
      np.testing.assert_array_equal(data.train_labels[ids[task]],
                                    b["label"][task])


@pytest.mark.parametrize("n,b", [(12, 3), (7, 3), (3, 3), (2, 5)])
def test_grouped_batcher_visits_each_example_once_per_epoch(n, b):
  data = _make_data(n_per_task=(n, 4))
  batcher = images_lib.GroupedBatcher(data, batch_size=2 * b, seed=0)
  task_ids = np.flatnonzero(data.train_tasks == 0)
  num_epochs = 4
  stream = np.concatenate([_example_ids(batcher.batch(s)["image"])[0]
                           for s in range(-(-num_epochs * n // b))])
  for e in range(num_epochs):
    epoch = stream[e * n:(e + 1) * n]
    np.testing.assert_array_equal(np.sort(epoch), task_ids)
  # Consecutive epochs use different orders.
  assert not np.array_equal(stream[:n], stream[n:2 * n]) or n <= 2


def test_grouped_batcher_rejects_too_small_batch():
  with pytest.raises(ValueError, match="at least 1"):
    images_lib.GroupedBatcher(_make_data(), batch_size=2, seed=0)


def test_eval_batches_cover_every_example_once():
  data = _make_data()
  for split, n in (("test", 15), ("train", 22)):
    batches = list(images_lib.eval_batches(data, split=split, batch_size=4))
    assert [len(b["label"]) for b in batches] == [4] * (n // 4) + [n % 4]
    for key, ref in (("label", f"{split}_labels"), ("task", f"{split}_tasks")):
      got = np.concatenate([b[key] for b in batches])
      assert got.dtype == np.int32
      np.testing.assert_array_equal(got, getattr(data, ref))
    img = np.concatenate([b["image"] for b in batches])
    assert img.dtype == np.float32
    np.testing.assert_allclose(
        img, images_lib.normalize_images(getattr(data, f"{split}_images")))
  assert len(list(images_lib.eval_batches(data, batch_size=1024))) == 1
  with pytest.raises(ValueError):
    list(images_lib.eval_batches(data, split="valid"))


def test_atomic_savez_from_concurrent_writers(tmp_path):
  """Writers of one cache file (processes on shared storage) never leave a torn file."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from ldro.data import fileio  # pylint: disable=g-import-not-at-top
  path = tmp_path / "sub" / "rows.npz"
  x = np.arange(200_000, dtype=np.int32).reshape(1000, 200)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    list(pool.map(lambda c: fileio.atomic_savez(path, compressed=c, x=x), [True, False] * 4))
  with np.load(path) as z:
    np.testing.assert_array_equal(z["x"], x)
  assert os.listdir(path.parent) == ["rows.npz"]  # no temporaries left
  assert path.stat().st_mode & 0o777 == 0o644


def test_atomic_text_and_json_writes_keep_the_old_file_on_failure(tmp_path):
  """A write that fails half-way (a kill, a value JSON cannot hold) leaves the old file whole."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from ldro.data import fileio  # pylint: disable=g-import-not-at-top
  path = tmp_path / "run.json"
  fileio.atomic_write_json(path, {"b": np.float32(0.5), "a": "ü"})
  text = path.read_text(encoding="utf-8")
  assert json.loads(text) == {"a": "ü", "b": 0.5} and text.index('"a"') < text.index('"b"')
  with pytest.raises(TypeError):
    fileio.atomic_write_json(path, {"a": object()})
  assert path.read_text(encoding="utf-8") == text and os.listdir(tmp_path) == ["run.json"]
  fileio.atomic_write_text(path, "x\n")
  assert path.read_text(encoding="utf-8") == "x\n"
