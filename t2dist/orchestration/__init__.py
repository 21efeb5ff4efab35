"""The Ray and DeepSpeed side of training and adaptation: the only package of ``t2dist`` that starts actors."""
