from longreach.models.gca.configuration_gca import GCA_DEFAULTS, GCAConfig, gca_settings
from longreach.models.gca.modeling_gca import GCABlock, GCAForCausalLM, GCAModel
from longreach.models.gca.retrieval import ChunkEncoder, GCAStack, select_chunks

__all__ = ["GCA_DEFAULTS", "ChunkEncoder", "GCABlock", "GCAConfig", "GCAForCausalLM", "GCAModel",
           "GCAStack", "gca_settings", "select_chunks"]
