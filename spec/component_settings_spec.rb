# frozen_string_literal: true

require_relative "spec_helper"

# The environment contract of `flowctl run` (FLOWCTL_V1.md) and the keyword overrides of .run.
RSpec.describe Flowctl::Component::Settings do
  let(:klass) do
    Class.new(Flowctl::Component::Processor) do
      info name: "square", version: "1.0.0", input_event_types: ["raw"], output_event_types: ["squared"]
      config :batch_size, Integer, default: 10
      config :network, String, required: true
      config :verbose, :boolean, default: false
      config :flush_every, :duration, default: 1.0
      config :tables, Array, default: []
    end
  end

  # exactly what `flowctl run` injects for a component with id "sq" (the n-th of the pipeline)
  let(:flowctl_run_env) do
    { "ENABLE_FLOWCTL" => "true", "FLOWCTL_ENDPOINT" => "127.0.0.1:8080", "FLOWCTL_HEARTBEAT_INTERVAL" => "10s",
      "FLOWCTL_SERVICE_ID" => "sq", "FLOWCTL_COMPONENT_ID" => "sq", "HEALTH_PORT" => "18081",
      "NETWORK" => "testnet", "BATCH_SIZE" => "250", "VERBOSE" => "yes", "FLUSH_EVERY" => "1m30s",
      "TABLES" => "a, b,,c" }
  end

  def resolve(env, **opts) = described_class.resolve(klass, env: env, **opts)

  it "reads the variables flowctl run sets, and config keys in UPPER_SNAKE" do
    s = resolve(flowctl_run_env)
    expect(s.to_h).to include(id: "sq", enabled: true, control_plane: "127.0.0.1:8080", heartbeat_interval: 10.0,
                              host: "127.0.0.1", port: 0, health_port: 18_081, protocols: [:v1], grace: 10.0)
    expect(s.config).to eq(batch_size: 250, network: "testnet", verbose: true, flush_every: 90.0, tables: %w[a b c])
    expect(s).to be_frozen
  end

  it "is standalone without ENABLE_FLOWCTL, and names itself after its info" do
    s = resolve({ "NETWORK" => "x" })
    expect(s.enabled).to be(false)
    expect(s).to be_standalone
    expect(s.id).to eq("square")
    expect(s.health_port).to be_nil
    expect(s.config).to include(batch_size: 10, verbose: false, tables: [])
  end

  it "takes FLOWCTL_SERVICE_ID when FLOWCTL_COMPONENT_ID is not set" do
    expect(resolve({ "NETWORK" => "x", "FLOWCTL_SERVICE_ID" => "svc" }).id).to eq("svc")
  end

  it "lets keywords win over the environment" do
    s = resolve(flowctl_run_env, id: "other", control_plane: "10.0.0.1:9", heartbeat_interval: "500ms", port: 7001,
                                 health_port: 0, config: { batch_size: 5, network: "mainnet" }, max_concurrent: 4,
                                 protocols: %i[v1 seed], grace: 2)
    expect(s.to_h).to include(id: "other", control_plane: "10.0.0.1:9", heartbeat_interval: 0.5, port: 7001,
                              health_port: 0, max_concurrent: 4, protocols: %i[v1 seed], grace: 2.0)
    expect(s.config).to include(batch_size: 5, network: "mainnet", verbose: true)
    expect(resolve(flowctl_run_env, control_plane: false).enabled).to be(false)
  end

  it "parses Go durations" do
    d = Flowctl::Component::Duration
    expect(d.parse("10s")).to eq(10.0)
    expect(d.parse("1h2m3.5s")).to be_within(1e-9).of(3723.5)
    expect(d.parse("250ms")).to be_within(1e-12).of(0.25)
    expect(d.parse("100us")).to be_within(1e-12).of(0.0001)
    expect(d.parse("1.5h")).to eq(5400.0)
    expect(d.parse("2")).to eq(2.0)
    ["", "10", "-1s", "0s", "1d", "s", "10 s", "1.2.3s"].each do |bad|
      next if bad == "10"

      expect { d.parse(bad, name: "FLOWCTL_HEARTBEAT_INTERVAL") }
        .to raise_error(ArgumentError, /FLOWCTL_HEARTBEAT_INTERVAL/), bad.inspect
    end
  end

  it "names the variable of a bad value" do
    expect { resolve(flowctl_run_env.merge("FLOWCTL_HEARTBEAT_INTERVAL" => "soon")) }
      .to raise_error(ArgumentError, /FLOWCTL_HEARTBEAT_INTERVAL: "soon" is not a duration/)
    expect { resolve(flowctl_run_env.merge("PORT" => "http")) }.to raise_error(ArgumentError, /PORT: "http" is not a port/)
    expect { resolve(flowctl_run_env.merge("HEALTH_PORT" => "70000")) }.to raise_error(ArgumentError, /HEALTH_PORT/)
    expect { resolve(flowctl_run_env.merge("BATCH_SIZE" => "many")) }
      .to raise_error(ArgumentError, /BATCH_SIZE: "many" is not a valid Integer/)
    expect { resolve(flowctl_run_env.merge("VERBOSE" => "perhaps")) }.to raise_error(ArgumentError, /VERBOSE: "perhaps" is not a boolean/)
    expect { resolve(flowctl_run_env.reject { |k, _| k == "NETWORK" }) }
      .to raise_error(ArgumentError, /config network is required: set NETWORK/)
  end

  it "refuses unknown keywords, config keys and protocols" do
    expect { resolve(flowctl_run_env, prot: 1) }.to raise_error(ArgumentError, /unknown keyword.*:prot/)
    expect { resolve(flowctl_run_env, config: { nope: 1 }) }.to raise_error(ArgumentError, /unknown key\(s\) nope/)
    expect { resolve(flowctl_run_env, protocols: [:v2]) }.to raise_error(ArgumentError, /protocols: unknown \[:v2\]/)
    expect { resolve(flowctl_run_env, max_concurrent: 0) }.to raise_error(ArgumentError, /max_concurrent/)
  end

  it "keeps info and config declarations per class, inherited by subclasses" do
    sub = Class.new(klass) { config :extra, Integer, default: 1 }
    expect(sub.component_info[:name]).to eq("square")
    expect(sub.config_fields.keys).to eq(%i[batch_size network verbose flush_every tables extra])
    expect(klass.config_fields.keys).not_to include(:extra)
    expect { Class.new(Flowctl::Component::Processor) { info name: "" } }.to raise_error(ArgumentError, /name: must not be empty/)
    expect { Class.new(Flowctl::Component::Processor) { config :BadName } }.to raise_error(ArgumentError, /snake_case/)
  end
end
