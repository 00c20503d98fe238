"""``msd demo``: a self-contained MSD demonstration that needs no model hub.

:mod:`msd.demo.world` draws a small image-language world (coloured shapes on a grid, and
conversations about them and about numbers and colours), :mod:`msd.demo.tokenizer` trains
a tokenizer on it, :mod:`msd.demo.target` a tiny LLaVA target, and :mod:`msd.demo.run`
chains those with the draft training (:mod:`msd.train.trainer`) into cached stages and
shows the engine answering about a scene no model saw.
"""
