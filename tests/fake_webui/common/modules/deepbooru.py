class DeepDanbooru:
    def tag(self, pil_image):
        return f"1girl, solo, {pil_image.size[0]}px"


model = DeepDanbooru()
