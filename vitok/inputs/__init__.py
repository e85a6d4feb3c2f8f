"""Inputs: where images come from, up to the uint8 patches a decode worker hands on.

    sources.py     SOURCES -> a listing (loose image files with keys and roots, or archives: tars, parquet)
    plan.py        listing -> the plan stored in OUT/plan/: units (= output shards), written once per generation
    changes.py     which inputs changed since they were extracted (size + mtime, or the content's sha256)
    retries.py     inputs that could not be read, planned again into retry units
    readers/       a unit -> samples (key, bytes or path, metadata): files, webdataset tars, parquet, remote files
    decode.py      bytes -> upright RGB pixels, or a one-line reason why not
    preprocess.py  RGB -> resized uint8 patches in the encoder's row order; normalised pixel values on the device
    identity.py    content identity: the file's sha256 and the pixel content id (grid + uint8 patches), a contract
    gpu_decode.py  ``--decode gpu``: baseline JPEGs decoded by nvJPEG in the device stage

Nothing here imports the pipeline, the CLI or the encoder's model.
"""
