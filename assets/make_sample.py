"""Draws assets/sample.jpg (the quick start's picture) and examples/eval/shapes.png.

Both are drawn from scratch here, so they carry the project's licence (MIT OR Apache-2.0).
Run from the repository root: python3 assets/make_sample.py (Pillow 13).
"""
from PIL import Image, ImageDraw

W, H = 480, 360
img = Image.new("RGB", (W, H))
d = ImageDraw.Draw(img)
# Sky: a vertical gradient from deep to pale blue.
for y in range(230):
    t = y / 230
    d.line([(0, y), (W, y)], fill=(int(70 + 120 * t), int(130 + 90 * t), int(220 + 30 * t)))
d.ellipse([370, 30, 440, 100], fill=(255, 214, 40))  # sun
# Grass hills.
d.rectangle([0, 230, W, H], fill=(80, 160, 70))
d.ellipse([-120, 190, 260, 320], fill=(95, 175, 80))
d.ellipse([200, 205, 620, 330], fill=(70, 150, 60))
# A house: white walls, red roof, blue door and windows.
d.rectangle([150, 180, 290, 290], fill=(245, 240, 225), outline=(90, 70, 60), width=2)
d.polygon([(135, 185), (220, 115), (305, 185)], fill=(200, 40, 35), outline=(120, 30, 25))
d.rectangle([205, 235, 238, 290], fill=(40, 70, 160))
d.rectangle([165, 200, 195, 228], fill=(170, 210, 240), outline=(90, 70, 60), width=2)
d.rectangle([250, 200, 280, 228], fill=(170, 210, 240), outline=(90, 70, 60), width=2)
# A tree.
d.rectangle([345, 210, 362, 290], fill=(110, 75, 40))
d.ellipse([315, 140, 395, 225], fill=(40, 120, 45))
# Two clouds.
for x, y in [(60, 50), (200, 35)]:
    for dx, dy, r in [(0, 10, 22), (25, 0, 28), (55, 8, 22)]:
        d.ellipse([x + dx - r, y + dy - r, x + dx + r, y + dy + r], fill=(250, 250, 252))
img.save("assets/sample.jpg", quality=85)

shapes = Image.new("RGB", (200, 150), (255, 255, 255))
s = ImageDraw.Draw(shapes)
s.ellipse([20, 35, 100, 115], fill=(30, 80, 200))  # a blue circle
s.rectangle([120, 45, 180, 105], fill=(230, 150, 20))  # an orange square
shapes.save("examples/eval/shapes.png", optimize=True)
