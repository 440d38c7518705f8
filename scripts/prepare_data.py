"""One-time preparation of the tfds image datasets in ArrayRecord format (needs TensorFlow).

deis_jax *reads* tfds data without TensorFlow (``tfds.data_source`` over ArrayRecord files), but
tfds *prepares* image datasets by encoding PNG/JPEG with ``tf.image``, so run this once in an
environment that has TensorFlow -- any machine; copy the result where training runs::

    pip install tensorflow tensorflow-datasets            # a separate venv is fine
    python scripts/prepare_data.py --dataset=cifar10 --data_dir=~/tensorflow_datasets
    python scripts/prepare_data.py --dataset=celeb_a --data_dir=gs://my-bucket/tfds \\
        --manual_dir=~/downloads/celeba
    python scripts/prepare_data.py --dataset=downsampled_imagenet/32x32 \\
        --data_dir=~/tensorflow_datasets --manual_dir=~/downloads/imagenet32

then point ``config.data.data_dir`` (or ``$TFDS_DATA_DIR``) at ``--data_dir``. The same can be
done with the tfds CLI, ``tfds build <name> --file_format=array_record --data_dir=<dir>``, when
the dataset's download URLs work.

Broken or quota-limited downloads: tfds fetches ``celeb_a`` from Google Drive (often over its
quota) and ``downsampled_imagenet/32x32`` from image-net.org/small/ (gone; tensorflow/datasets
#4662). Download the original files yourself into one folder and pass ``--manual_dir``; every
URL tfds asks for whose file is found there is used instead of downloading:

* ``celeb_a``: ``img_align_celeba.zip``, ``list_eval_partition.txt``, ``list_attr_celeba.txt``,
  ``list_landmarks_align_celeba.txt``, ``identity_CelebA.txt`` (from the CelebA site,
  mmlab.ie.cuhk.edu.hk/projects/CelebA.html, or its Google Drive / Baidu mirrors).
* ``downsampled_imagenet/32x32``: ``train_32x32.tar`` and ``valid_32x32.tar`` (van den Oord et
  al.'s ImageNet 32x32; e.g. the Academic Torrents copy referenced in google-research/vdm#8).
"""

from __future__ import annotations

import argparse
import os
import sys

DATASETS = ("cifar10", "celeb_a", "downsampled_imagenet/32x32", "imagenet_resized/32x32")

# Google Drive ids used by tfds' celeb_a builder -> the file names the CelebA site uses.
CELEBA_DRIVE_FILES = {
    "0B7EVK8r0v71pZjFTYXZWM3FlRnM": "img_align_celeba.zip",
    "0B7EVK8r0v71pY0NSMzRuSXJEVkk": "list_eval_partition.txt",
    "0B7EVK8r0v71pd0FJY3Blby1HUTQ": "list_landmarks_align_celeba.txt",
    "0B7EVK8r0v71pblRyaVFSWGxPY0U": "list_attr_celeba.txt",
    "1_ee_0u7vcNLOfNLegJRHmolfH5ICW-XS": "identity_CelebA.txt",
}


def local_file_for(url: str, manual_dir: str) -> str | None:
    """The file in ``manual_dir`` standing in for ``url`` (None if there is none)."""
    name = None
    for drive_id, filename in CELEBA_DRIVE_FILES.items():
        if drive_id in url:
            name = filename
    if name is None:
        name = url.rstrip("/").rsplit("/", 1)[-1].split("?")[0]
    path = os.path.join(manual_dir, name)
    return path if name and os.path.isfile(path) else None


def use_manual_files(manual_dir: str) -> None:
    """Make tfds' ``DownloadManager.download`` return local files found in ``manual_dir``."""
    import tensorflow_datasets as tfds
    from etils import epath

    manager_cls = tfds.download.DownloadManager
    original = manager_cls.download

    def download(self, url_or_urls):
        def one(url):
            local = local_file_for(str(url), manual_dir)
            if local is not None:
                print(f"using {local} for {url}")
                return epath.Path(local)
            return original(self, url)

        if isinstance(url_or_urls, dict):
            return {k: one(v) for k, v in url_or_urls.items()}
        if isinstance(url_or_urls, list | tuple):
            return type(url_or_urls)(one(u) for u in url_or_urls)
        return one(url_or_urls)

    manager_cls.download = download


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument(
        "--data_dir",
        default=os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"),
        help="where to write <dataset>/<version>/ (local path or gs://)",
    )
    parser.add_argument("--manual_dir", default=None, help="folder with downloaded files")
    args = parser.parse_args(argv)

    try:
        import tensorflow  # noqa: F401
    except ImportError:
        print(
            "Preparing tfds image datasets needs TensorFlow (tfds encodes images with "
            "tf.image). Run `pip install tensorflow tensorflow-datasets` in this (or a "
            "separate) environment and re-run; training itself does not need TensorFlow.",
            file=sys.stderr,
        )
        return 1
    import tensorflow_datasets as tfds

    data_dir = os.path.expanduser(args.data_dir)
    download_config = None
    if args.manual_dir:
        manual_dir = os.path.expanduser(args.manual_dir)
        use_manual_files(manual_dir)
        download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    builder = tfds.builder(args.dataset, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=download_config)
    print(f"prepared {args.dataset} in {builder.data_dir} (splits: {list(builder.info.splits)})")
    print(f"use it with --config.data.data_dir={data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
