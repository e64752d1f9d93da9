# herald for docker-compose and production: one image, a role per container.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin herald

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY --from=build /src/target/release/herald /usr/local/bin/herald
COPY config ./config
COPY templates ./templates
ENV HERALD_ENV=production
ENTRYPOINT ["herald"]
CMD ["all"]
