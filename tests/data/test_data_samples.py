"""The sample photographs as JPEG files of a chosen size (what the data benchmark reads)."""

from PIL import Image

from openmae.data.samples import make_sized_photos, sample_photos


def test_sized_photos_have_the_size_asked_for_and_distinct_copies(tmp_path):
    files = make_sized_photos(tmp_path, (200, 150), copies=2)
    assert len(files) == 2 * len(sample_photos())
    for path in files:
        with Image.open(path) as image:
            assert image.size == (200, 150) and image.format == "JPEG" and image.mode == "RGB"
    first, second = files[0].read_bytes(), files[1].read_bytes()
    assert files[0].name.endswith("_000.jpg") and files[1].name.endswith("_001.jpg") and first != second
