"""Input data: the tf.data pipeline, its transforms, image folders, the embedded digits, class names.

Importing this package imports neither TensorFlow nor TFDS; the pipeline imports them when it runs.
"""
