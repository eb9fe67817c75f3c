"""Image files of a dataset: decoding, and cheap checks of size and truncation.

    read_image(path) -> (H, W, 3) uint8 RGB, or UserError naming the file
    list_images(["a.png", "dir/"]) -> the files, folders expanded to their image files
    check_image_files(images, image_dir, mode, report)

In: paths (and, for the checks, the json's image entries with their ``file_name``, ``width`` and
``height``). Out: the decoded RGB array (OpenCV, EXIF orientation ignored so that the size matches
the json), or one problem line per file: missing, a folder, empty, a JPEG without its end-of-image
marker, a PNG without its IEND chunk, undecodable, or a size unlike the json's. ``mode``
``header`` reads only the file header (PIL); ``full`` decodes every file (in threads). The data
loader workers and the predictor decode through :func:`read_image`.
"""
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
from PIL import Image

from ..utils import UserError

__all__ = ["IMAGE_EXTENSIONS", "list_images", "read_image", "check_image_files"]


# --------------------------------------------------------------------------------------------
# Image files
# --------------------------------------------------------------------------------------------
# the file names a folder is expanded to (case-insensitive)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def list_images(paths):
    """Expand files and folders into image file paths.

    Args:
        paths: files (kept as they are, whatever their extension) and folders (their files
            with an :data:`IMAGE_EXTENSIONS` extension, sorted, not recursive).

    Returns:
        list of paths, in the order given.
    """
    out = []
    for path in paths:
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
            out.extend(os.path.join(path, n) for n in names)
        else:
            out.append(path)
    return out


def _jpeg_truncation_problem(data):
    """None if the JPEG has an end-of-image marker after its first scan, else what is wrong."""
    pos = 2
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return "truncated JPEG (the file ends before the image data)"
        marker = data[pos + 1]
        if marker == 0xFF or marker == 0x00:        # fill byte / stuffed byte: keep looking
            pos += 1
            continue
        if marker == 0xD9:
            return "corrupt JPEG (end-of-image marker before any image data)"
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if pos + 4 > len(data):
            return "truncated JPEG (the file ends inside a header segment)"
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        pos += 2 + length
        if marker == 0xDA:                          # start of scan: the image data follows
            break
    if data.find(b"\xff\xd9", pos) < 0:
        return "truncated JPEG (no end-of-image marker)"
    return None


def _png_truncation_problem(data):
    """None if walking the PNG chunks reaches IEND, else what is wrong."""
    pos = 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        if data[pos + 4:pos + 8] == b"IEND":
            return None
        pos += 12 + length
    return "truncated PNG (no IEND chunk)"


def _truncation_problem(data):
    """The JPEG or PNG truncation problem of a file's bytes; None for other formats."""
    if data[:2] == b"\xff\xd8":
        return _jpeg_truncation_problem(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _png_truncation_problem(data)
    return None


def _decode_image(path):
    """(RGB image, None) or (None, problem). Ignores EXIF orientation so sizes match the json."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, "image file not found"
    except IsADirectoryError:
        return None, "is a folder, expected an image file"
    except OSError as e:
        return None, "cannot read the image file (%s)" % (e.strerror or e)
    if not data:
        return None, "empty image file"
    problem = _truncation_problem(data)
    if problem:
        return None, problem
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8),
                             cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as e:
        return None, "OpenCV cannot decode the image (%s)" % str(e).strip().splitlines()[-1]
    if image is None:
        return None, "corrupt or unsupported image file (OpenCV cannot decode it)"
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), None


def read_image(path):
    """Decode an image file into an RGB array (OpenCV; EXIF orientation ignored).

    Args:
        path (str): the image file.

    Returns:
        uint8 RGB (H, W, 3).

    Raises:
        UserError: naming the file when it is missing, empty, corrupt or truncated (JPEG files
            must have their end-of-image marker and PNG files their IEND chunk).
    """
    image, problem = _decode_image(path)
    if problem:
        raise UserError("%s: %s" % (path, problem))
    return image


def _header_size(path):
    """((width, height), None) from the file header without decoding, or (None, problem)."""
    try:
        with Image.open(path) as im:
            return im.size, None
    except FileNotFoundError:
        return None, "image file not found"
    except IsADirectoryError:
        return None, "is a folder, expected an image file"
    except Exception as e:   # PIL raises many types for bad headers; all mean the same here
        return None, "cannot read the image header (%s)" % (str(e) or type(e).__name__)


def _image_file_problem(path, width, height, mode):
    """None if the file at ``path`` is an image of ``width x height`` (decoded fully if 'full')."""
    try:
        size, problem = _header_size(path)
        if problem:
            return problem
        if tuple(size) != (width, height):
            return ("file is %dx%d (width x height) but the json says %dx%d"
                    % (size[0], size[1], width, height))
        if mode == "full":
            image, problem = _decode_image(path)
            if problem:
                return problem
            if image.shape[:2] != (height, width):
                return ("decoded image is %dx%d (width x height) but the json says %dx%d"
                        % (image.shape[1], image.shape[0], width, height))
        return None
    except Exception as e:   # never let a decoder error escape as a traceback
        return "cannot check the image file (%s: %s)" % (type(e).__name__, e)


def check_image_files(images, image_dir, mode, report):
    """Check each image file in a thread pool (PIL and OpenCV release the GIL while decoding).

    Args:
        images (list[dict]): json image entries with ``id``, ``file_name``, ``width``,
            ``height``.
        image_dir (str): the folder ``file_name`` is relative to.
        mode (str): ``header`` (PIL reads the size) or ``full`` (also decode the file).
        report (DatasetReport): gets one problem line per bad file (path, image id, what).
    """
    if not os.path.isdir(image_dir):
        report.add_problem("%s: image folder not found" % image_dir)
        return
    jobs = [(os.path.join(image_dir, img["file_name"]), int(img["width"]), int(img["height"]),
             img["id"]) for img in images]
    workers = min(32, 2 * (os.cpu_count() or 1) + 2)

    def check(job):
        return _image_file_problem(job[0], job[1], job[2], mode)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(check, jobs)
        if len(jobs) >= 2000:
            from tqdm import tqdm
            results = tqdm(results, total=len(jobs), desc="checking images", file=sys.stderr,
                           disable=not sys.stderr.isatty())
        for (path, _, _, image_id), problem in zip(jobs, results):
            if problem:
                report.add_problem("%s: image %d: %s" % (path, image_id, problem))
