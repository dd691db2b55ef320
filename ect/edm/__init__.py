from ect.edm.convert import convert_edm_pickle, read_edm_network
from ect.edm.pickle_reader import EDMFormatError, load_edm_pickle

__all__ = ["convert_edm_pickle", "read_edm_network", "load_edm_pickle", "EDMFormatError"]
