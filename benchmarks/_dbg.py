import time, tempfile, httpx, statistics
from pathlib import Path
from benchmarks.common import Server
with tempfile.TemporaryDirectory() as tmp, Server(Path(tmp), {}) as s:
    c = httpx.Client(base_url=s.url)
    c.post("/v1/collections/kb/documents", json={"documents":[{"id":f"d{i}","text":f"document number {i} about python"} for i in range(50)]})
    wall=[]; tt=[]
    for i in range(60):
        t=time.perf_counter(); r=c.post("/v1/collections/kb/search", json={"query":f"How do I use decorators in Python number {i}?","debug":True}); wall.append((time.perf_counter()-t)*1000)
        tt.append(r.json()["timings_ms"])
    print("wall p50", statistics.median(wall))
    for k in tt[0]: print(k, statistics.median([x.get(k,0) for x in tt]))
    wall=[]
    for i in range(60):
        t=time.perf_counter(); r=c.post("/v1/embeddings", json={"input":f"How do I use decorators in Python number {i}?"}); wall.append((time.perf_counter()-t)*1000)
    print("embeddings wall p50", statistics.median(wall))
    wall=[]
    for i in range(60):
        t=time.perf_counter(); r=c.get("/health"); wall.append((time.perf_counter()-t)*1000)
    print("health p50", statistics.median(wall))
