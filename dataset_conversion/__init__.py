"""Dataset converters to nnU-Net raw datasets with an unlabeled pool (``imagesUnlabeled/``).

Each entry of :data:`CONVERTERS` is a module of this package with ``main(argv) -> int``; the CLI runs it as
``nnunet_ssl convert <name> ...``. Every converter writes a valid dataset.json (nnU-Net's generator, plus
``numUnlabeled``), records its split in ``ssl_split.json`` beside it, refuses to overwrite unless asked, and
builds the dataset in a temporary folder that is renamed into place only when complete.
"""

CONVERTERS: dict[str, str] = {
    "acdc": "Dataset801_ACDC_SSL",       # ACDC challenge layout (patientXXX/..._frameYY.nii.gz, Info.cfg)
    "acdc-h5": "Dataset802_ACDC_H5",     # ACDC, SSL4MIS HDF5 slices/volumes
    "la-h5": "Dataset803_LA_H5",         # Left Atrium 2018, UA-MT HDF5 volumes
    "msd": "msd_to_ssl",                 # MSD task folder or nnU-Net raw dataset -> N labeled + unlabeled
    "add-unlabeled": "add_unlabeled",    # add a folder of unlabeled images to an existing dataset
}
