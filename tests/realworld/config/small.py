# a config file: plain assignments exec'd into the training script's globals
n_hidden = 48
max_iters = 30
