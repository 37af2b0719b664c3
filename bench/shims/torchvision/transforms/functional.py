"""transforms.functional.crop, as diffusers' example scripts call it."""


def crop(image, top, left, height, width):
    return image.crop((left, top, left + width, top + height))

