"""Inputs: where images come from, up to the uint8 patches a decode worker hands on.

    sources.py     SOURCES -> a listing (loose image or video files with keys and roots, or archives: tars, parquet)
    plan.py        listing -> the plan stored in OUT/plan/: units (= output shards), written once per generation
    changes.py     which inputs changed since they were extracted (size + mtime, or the content's sha256)
    retries.py     inputs that could not be read, planned again into retry units
    readers/       a unit -> samples (key, bytes or path, metadata): files, webdataset tars, parquet, remote files
    decode.py      bytes -> upright RGB pixels, or a one-line reason why not
    preprocess.py  RGB -> resized uint8 patches in the encoder's row order; normalised pixel values on the device
    identity.py    content identity: the file's sha256 and the pixel content id (grid + uint8 patches), a contract
    gpu_decode.py  ``--decode gpu``: baseline JPEGs decoded by nvJPEG in the device stage
    video_config.py      the video processor's settings (sampling, pixel budget, decoder, limits), torch-free
    video_decode.py      a video file or its bytes -> metadata and RGB frames by ordinal (torchcodec or PyAV)
    video_preprocess.py  sampled frames -> resized uint8 video patches (t*h*w, C, 2, p, p), frame indices and times

Nothing here imports the pipeline, the CLI or the encoder's model.
"""
