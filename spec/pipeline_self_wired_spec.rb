# frozen_string_literal: true

require "spec_helper"
require "flowctl/pipeline"
require "rbconfig"

# wiring: discovery: the runner starts and supervises the components but moves no event;
# each component with inputs finds them through DiscoverComponents and reads them itself
# (spec/fixtures/pipeline/self_wired.rb).
RSpec.describe "flowctl-pipeline with components that wire themselves (wiring: discovery)" do
  let(:source_script) { File.expand_path("fixtures/pipeline/components.rb", __dir__) }
  let(:self_wired_script) { File.expand_path("fixtures/pipeline/self_wired.rb", __dir__) }

  before do
    skip "needs Flowctl::Component (the component SDK)" unless defined?(Flowctl::Component::Source)
  end

  include PipelineRunHelpers

  def source(id, config, extra = "") = component_yaml(id, source_script, "source", config, extra)
  def wired(id, kind, config = {}, extra = "") = component_yaml(id, self_wired_script, kind, config, extra)

  def pipeline(body, wiring: "discovery")
    path = File.join(@dir, "p.yaml")
    File.write(path, <<~YAML)
      apiVersion: flowctl/v1
      kind: Pipeline
      metadata: {name: self-wired}
      spec:
        #{wiring ? "wiring: #{wiring}" : ''}
        heartbeat_interval: 200ms
        shutdown_grace: 5s
      #{body.gsub(/^/, '  ')}
    YAML
    Flowctl::Pipeline::Definition.load(path)
  end

  it "runs a fan-out and a fan-in the components wire themselves; complete when every sink ended" do
    # p1 <- a; p2 <- a, b (fan-in); s1 <- p1, p2 (fan-in of processors); s2 <- p2, event type "two" only
    d = pipeline(<<~YAML)
      sources:
        - #{source('a', 'count' => 120)}
        - #{source('b', 'count' => 80)}
      processors:
        - #{wired('p1', 'processor', { 'out_type' => 'one', 'factor' => 2 }, ', inputs: [a]')}
        - #{wired('p2', 'processor', { 'out_type' => 'two', 'factor' => 3 }, ', inputs: [a, b]')}
      sinks:
        - #{wired('s1', 'sink', { 'out_file' => out('s1') }, ', inputs: [p1, p2]')}
        - #{wired('s2', 'sink', { 'out_file' => out('s2') }, ', inputs: [p1, p2], input_event_types: [two]')}
    YAML
    r = runner(d)
    run = r.run
    expect(run.status).to eq("COMPLETED"), "#{run.error}\n#{runner_messages}"
    expect(r.router).to be_a(Flowctl::Pipeline::SelfWired) # the runner opened no stream
    one = (0...120).map { |i| "a-#{i} one #{2 * i}" }
    two = (0...120).map { |i| "a-#{i} two #{3 * i}" } + (0...80).map { |i| "b-#{i} two #{3 * i}" }
    expect(lines("s1").sort).to eq((one + two).sort)
    expect(lines("s2").sort).to eq(two.sort) # FLOWCTL_INPUT_EVENT_TYPES filtered p1's events out
    expect(run.counts.keys).to match_array(%w[a b p1 p2 s1 s2])
    expect(run.counts["s1"]).to include("role" => "sink", "restarts" => 0)
    expect_no_component_left
  end

  it "restarts a processor killed with SIGKILL; its reader finds it again and resumes the source behind it" do
    d = pipeline(<<~YAML)
      sources: [#{source('a', 'count' => 1500, 'delay_ms' => 1)}]
      processors: [#{wired('p', 'processor', {}, ', restart: {backoff: 100ms}')}]
      sinks: [#{wired('s', 'sink', 'out_file' => out('s'))}]
    YAML
    r = runner(d)
    killed = Thread.new do
      wait_until(60, "events at the sink") { lines("s").size > 200 }
      Process.kill("KILL", r.supervisor.slots["p"].child.pid)
      true
    end
    run = r.run
    expect(run.status).to eq("COMPLETED"), "#{run.error}\n#{runner_messages}"
    expect(killed.value).to be(true)
    ids = lines("s").map { |l| l.split.first }
    expect(ids.uniq.sort).to eq((0...1500).map { |i| "a-#{i}" }.sort) # nothing lost from the resumed cursor on
    expect(ids.size - ids.uniq.size).to be <= 300 # at-least-once: what was in flight may come again
    expect(run.counts["p"]["restarts"]).to eq(1)
    expect_no_component_left
  end

  it "shows the components' own counts, and stops in order on request (sources, processors, sinks)" do
    d = pipeline(<<~YAML)
      sources: [#{source('a', 'count' => 1_000_000, 'delay_ms' => 1)}]
      processors: [#{wired('p', 'processor')}]
      sinks: [#{wired('s', 'sink', 'out_file' => out('s'))}]
    YAML
    r = runner(d, params: { "start_ledger" => "5" })
    result = Thread.new { r.run }
    wait_until(60, "events at the sink") { lines("s").size > 50 }
    # the sink's heartbeat metrics (events_received) are its progress
    wait_until(10, "the sink's count in the snapshot") { r.router.snapshot["s"]["in"].positive? }
    env = r.supervisor.environment(d["s"], 1)
    expect(env).to include("FLOWCTL_WIRING" => "discovery", "FLOWCTL_INPUTS" => "p",
                           "FLOWCTL_STREAM_PARAMS" => '{"start_ledger":"5"}')
    r.request_stop
    run = result.value
    expect(run.status).to eq("STOPPED")
    expect(run.error).to be_nil # every component ended within the grace period
    expect(run.counts["s"]["in"]).to be_positive
    expect_no_component_left
  end

  it "fails the run naming a component that is gone for good" do
    d = pipeline(<<~YAML)
      sources: [#{source('a', 'count' => 1_000_000, 'delay_ms' => 1)}]
      processors: [#{wired('p', 'processor', {}, ', restart: {policy: never}')}]
      sinks: [#{wired('s', 'sink', 'out_file' => out('s'))}]
    YAML
    r = runner(d)
    Thread.new do
      wait_until(60, "events at the sink") { lines("s").size > 20 }
      Process.kill("KILL", r.supervisor.slots["p"].child.pid)
    end
    run = r.run
    expect(run.status).to eq("FAILED")
    expect(run.error).to include('processor "p"', "killed by SIGKILL (restart policy never")
    expect_no_component_left
  end

  it "gives the runner's wiring by default and lets the runner override the file" do
    body = <<~YAML
      sources: [#{source('a', 'count' => 1)}]
      sinks: [#{wired('s', 'sink', 'out_file' => out('s'))}]
    YAML
    expect(pipeline(body, wiring: nil).wiring).to eq("runner")
    d = pipeline(body)
    expect(d.wiring).to eq("discovery")
    expect { runner(d, wiring: "magic") }.to raise_error(ArgumentError, /wiring: "magic" is not one of runner, discovery/)
    sup = Flowctl::Pipeline::Supervisor.new(d, nil, control_plane: "127.0.0.1:1", wiring: "runner")
    expect(sup.environment(d["s"], 1)).to include("FLOWCTL_WIRING" => "runner", "FLOWCTL_INPUTS" => "a")
    expect(sup.environment(d["s"], 1)).not_to include("FLOWCTL_STREAM_PARAMS")
  end
end
