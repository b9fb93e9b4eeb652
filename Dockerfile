# syntax=docker/dockerfile:1
# Build: docker build -t egress-proxy .
# The image runs the TypeScript sources directly on Node 24 (type stripping): no build step.

FROM node:24-bookworm-slim AS deps
WORKDIR /app
COPY package.json package-lock.json ./
# Production dependencies only; the image already has Node 24, so the "node" devDependency is not needed.
RUN npm ci --omit=dev --ignore-scripts --no-audit --no-fund

FROM node:24-bookworm-slim
ENV NODE_ENV=production \
    MALLOC_ARENA_MAX=2 \
    MALLOC_MMAP_THRESHOLD_=131072 \
    EGRESS_LISTEN=0.0.0.0:8080 \
    EGRESS_ADMIN_LISTEN=0.0.0.0:9090 \
    EGRESS_ROUTES=/app/routes \
    EGRESS_CERTS=/data/certs \
    EGRESS_STORE=file:/data/store.json \
    EGRESS_MASTER_KEY_FILE=/data/master.key \
    EGRESS_AUDIT_LOG=/data/audit.log
WORKDIR /app
COPY --from=deps /app/node_modules ./node_modules
COPY package.json ./
COPY bin ./bin
COPY src ./src
COPY routes ./routes
# Compile every module now, with ENTRYPOINT's flags (the cache is kept per Node version and flags),
# into the folder bin/egress.js reads: a start then neither loads the type stripper (about 18 MB that
# stay resident) nor compiles, and the cache is root's, so the node user cannot plant code in it.
RUN node --disable-sigusr1 --max-semi-space-size=4 --heap-growing-percent=10 --v8-pool-size=1 --no-concurrent-recompilation --input-type=module -e "import { enableCompileCache } from 'node:module'; import { globSync } from 'node:fs'; enableCompileCache('/app/node_modules/.cache/egress-compile'); for (const f of globSync('src/**/*.ts')) await import('/app/' + f);"
# State lives in /data (a volume); the rest of the filesystem can be mounted read-only.
RUN mkdir -p /data && chown node:node /data && chmod 700 /data
VOLUME ["/data"]
USER node
EXPOSE 8080 9090
# The admin listener EGRESS_ADMIN_LISTEN names (an operator may move it), that of all interfaces on loopback.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["node", "-e", "const a = (process.env.EGRESS_ADMIN_LISTEN || '127.0.0.1:9090').trim(), i = a.lastIndexOf(':'), h = a.slice(0, i); fetch('http://' + ({ '': '127.0.0.1', '0.0.0.0': '127.0.0.1', '[::]': '[::1]' }[h] ?? h) + ':' + a.slice(i + 1) + '/healthz').then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
ENTRYPOINT ["node", "--disable-sigusr1", "--max-semi-space-size=4", "--heap-growing-percent=10", "--v8-pool-size=1", "--no-concurrent-recompilation", "bin/egress.js"]
CMD ["serve"]
