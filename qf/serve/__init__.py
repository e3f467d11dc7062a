"""qserve's HTTP layer (an optional extra: `pip install 'qf[server]'`): OpenAI-compatible endpoints over a
loaded `qf.runtime.Model`. Import `qf.serve.app` only when FastAPI is installed; the core package never does."""
