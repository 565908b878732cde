"""Demo and test tooling a user may run (`pip install .[demo]`): the tiny generated model (tiny_model), the whole
air-gapped journey (journey, `./build.sh demo` = demo), a network-less systemd target (nspawn), an offline conda
channel (conda_channel) and a Hugging Face / ModelScope compatible hub server (hub). The tests import it; the
product (packager/, installer/) never does.
"""
