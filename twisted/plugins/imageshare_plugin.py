from twisted.application.service import ServiceMaker

imageshare = ServiceMaker(
    "ImageShare",
    "imageshare.tap",
    "DICOM ingest, JPEG 2000 transcoding and JPIP/WADO/XDS-I.b image sharing server",
    "imageshare",
)
