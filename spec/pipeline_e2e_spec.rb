# frozen_string_literal: true

require "spec_helper"
require "flowctl/pipeline"
require "rbconfig"
require "tmpdir"
require "open3"

# The runner with real components (Flowctl::Component child processes, flowctl.v1 streams,
# the embedded control plane): routing, exactly-once delivery, crashes, live configuration,
# persistence, the executable and its signals.
RSpec.describe "flowctl-pipeline with real components" do
  E2E_COMPONENTS = File.expand_path("fixtures/pipeline/components.rb", __dir__)
  PIPELINE_EXE = File.expand_path("../exe/flowctl-pipeline", __dir__) unless defined?(PIPELINE_EXE)

  before do
    skip "needs Flowctl::Component (the component SDK)" unless defined?(Flowctl::Component::Source)
  end

  include PipelineRunHelpers

  def comp(id, kind, config = {}, extra = "") = component_yaml(id, E2E_COMPONENTS, kind, config, extra)

  def pipeline(body, name: "e2e", grace: "5s")
    path = File.join(@dir, "#{name}.yaml")
    File.write(path, <<~YAML)
      apiVersion: flowctl/v1
      kind: Pipeline
      metadata: {name: #{name}}
      spec:
        heartbeat_interval: 200ms
        shutdown_grace: #{grace}
        ready_timeout: 30s
      #{body.gsub(/^/, '  ')}
    YAML
    Flowctl::Pipeline::Definition.load(path)
  end

  it "delivers every event exactly once through a fan-out, a fan-in and a slow sink" do
    # p1 <- a; p2 <- a, b (fan-in); a -> p1, p2 (fan-out); slow <- p1, p2; fast <- p2
    d = pipeline(<<~YAML)
      sources:
        - #{comp('a', 'source', 'count' => 300)}
        - #{comp('b', 'source', 'count' => 200)}
      processors:
        - #{comp('p1', 'processor', { 'out_type' => 'one' }, ', inputs: [a]')}
        - #{comp('p2', 'processor', { 'out_type' => 'two' }, ', inputs: [a, b]')}
      sinks:
        - #{comp('slow', 'sink', { 'out_file' => out('slow'), 'delay_ms' => 2 }, ', inputs: [p1, p2]')}
        - #{comp('fast', 'sink', { 'out_file' => out('fast') }, ', inputs: [p2]')}
    YAML
    run = runner(d).run
    expect(run.status).to eq("COMPLETED"), run.error.to_s
    slow = lines("slow").map { |l| l.split.first(2).join(" ") }
    fast = lines("fast").map { |l| l.split.first(2).join(" ") }
    expected_slow = (0...300).map { |i| "a-#{i} one" } + (0...300).map { |i| "a-#{i} two" } + (0...200).map { |i| "b-#{i} two" }
    expect(slow.sort).to eq(expected_slow.sort)
    expect(fast.sort).to eq(((0...300).map { |i| "a-#{i} two" } + (0...200).map { |i| "b-#{i} two" }).sort)
    expect(run.counts["slow"]).to include("in" => 800, "failed" => 0, "restarts" => 0)
    expect(run.counts["p2"]).to include("in" => 500, "out" => 500)
    expect_no_component_left
  end

  it "routes failed events to the dead-letter sink and counts them" do
    d = pipeline(<<~YAML)
      dead_letter: dlq
      sources: [#{comp('a', 'source', 'count' => 50)}]
      processors: [#{comp('p', 'processor', 'fail_every' => 10)}]
      sinks:
        - #{comp('ok', 'sink', 'out_file' => out('ok'))}
        - #{comp('dlq', 'sink', 'out_file' => out('dlq'))}
    YAML
    run = runner(d).run
    expect(run.status).to eq("COMPLETED"), run.error.to_s
    expect(lines("dlq").map { |l| l.split.first }).to eq(%w[a-0 a-10 a-20 a-30 a-40])
    expect(lines("ok").size).to eq(45)
    expect(run.counts["p"]["failed"]).to eq(5)
  end

  it "restarts a processor killed with SIGKILL mid-run and loses nothing from the source's cursor on" do
    d = pipeline(<<~YAML)
      sources: [#{comp('a', 'source', 'count' => 1500, 'delay_ms' => 1)}]
      processors: [#{comp('p', 'processor', {}, ', restart: {backoff: 100ms}')}]
      sinks: [#{comp('s', 'sink', 'out_file' => out('s'))}]
    YAML
    r = runner(d)
    killed = Thread.new do
      wait_until(30, "events at the sink") { lines("s").size > 200 }
      pid = r.supervisor.slots["p"].child.pid
      Process.kill("KILL", pid)
      pid
    end
    run = r.run
    expect(run.status).to eq("COMPLETED"), run.error.to_s
    expect(killed.value).to be_a(Integer)
    ids = lines("s").map { |l| l.split.first }
    expect(ids.uniq.sort).to eq((0...1500).map { |i| "a-#{i}" }.sort)
    expect(run.counts["p"]["restarts"]).to eq(1)
    expect(run.counts["a"]["reconnects"]).to eq(0) # the source never noticed
    expect_no_component_left
  end

  it "restarts a source killed with SIGKILL and resumes it after the last event routed" do
    d = pipeline(<<~YAML)
      sources: [#{comp('a', 'source', { 'count' => 1500, 'delay_ms' => 1 }, ', restart: {backoff: 100ms}')}]
      sinks: [#{comp('s', 'sink', 'out_file' => out('s'))}]
    YAML
    r = runner(d)
    Thread.new do
      wait_until(30, "events at the sink") { lines("s").size > 300 }
      Process.kill("KILL", r.supervisor.slots["a"].child.pid)
    end
    run = r.run
    expect(run.status).to eq("COMPLETED"), run.error.to_s
    ids = lines("s").map { |l| l.split.first }
    expect(ids.uniq.sort).to eq((0...1500).map { |i| "a-#{i}" }.sort)
    expect(ids.size - ids.uniq.size).to be <= 1 # at-least-once: at most the event in flight again
    expect(run.counts["a"]).to include("restarts" => 1, "reconnects" => 1)
  end

  it "pushes a configuration update to a running component; its heartbeat reports the version; bad updates are refused" do
    db = File.join(@dir, "cp.db")
    d = pipeline(<<~YAML)
      sources: [#{comp('a', 'source', 'count' => 100_000, 'delay_ms' => 2)}]
      processors: [#{comp('p', 'processor')}]
      sinks: [#{comp('s', 'sink', 'out_file' => out('s'))}]
    YAML
    r = runner(d, db: db)
    result = Thread.new { r.run }
    wait_until(30, "events at the sink") { lines("s").size > 20 }
    cp = r.control_plane
    cfg = Flowctl::Config.client(cp)
    v1 = cfg.get_config(component_id: "p")
    expect([v1.version, v1.values]).to eq([1, { "factor" => "1" }])
    v2 = cfg.update_config(component_id: "p", values: { "factor" => "7" }, merge: true, author: "spec")
    expect(v2.version).to eq(2)
    status = Flowctl::Pipeline::Wire.client(:ControlPlaneClient, cp)
    wait_until(10, "config_version 2 in p's heartbeat") do
      status.get_component_status(service_id: "p").metrics["config_version"] == "2"
    end
    expect(cfg.get_config(component_id: "p").acknowledged_version).to eq(2)
    wait_until(10, "payloads multiplied by 7") { lines("s").last(5).all? { |l| l.split[2].to_i == 7 * l.split[0][/\d+\z/].to_i } }
    expect { cfg.update_config(component_id: "p", values: { "factor" => "1000" }, merge: true) }
      .to raise_error(Flowctl::InvalidArgument, /config key "factor": 1000 is above the maximum 100/)
    expect(cfg.rollback_config(component_id: "p", version: 1).version).to eq(3)
    wait_until(10, "config_version 3") { status.get_component_status(service_id: "p").metrics["config_version"] == "3" }
    r.request_stop
    run = result.value
    expect(run.status).to eq("STOPPED")
    cfg.close
    status.close

    # a control plane started again on the same file keeps the runs and the configurations
    store = Flowctl::Pipeline::RunStore.open(db)
    expect(store.get(run.id).to_h.values_at(:status, :name)).to eq(%w[STOPPED e2e])
    store.close
    again = Flowctl::Pipeline::EmbeddedControlPlane.new(db: db).start
    cfg = Flowctl::Config.client(again.endpoint)
    expect(cfg.config_history(component_id: "p").versions.map { |v| [v.version, v.values["factor"]] }).to eq(
      [[1, "1"], [2, "7"], [3, "1"]]
    )
    expect { cfg.update_config(component_id: "p", values: { "factor" => "0" }) }
      .to raise_error(Flowctl::InvalidArgument, /config key "factor": 0 is below the minimum 1/)
    cfg.close
    again.stop
  end

  it "runs from the executable, stops in order on SIGTERM, records the run and leaves no process behind" do
    d = pipeline(<<~YAML)
      sources: [#{comp('a', 'source', 'count' => 1_000_000, 'delay_ms' => 1)}]
      processors: [#{comp('p', 'processor')}]
      sinks: [#{comp('s', 'sink', 'out_file' => out('s'))}]
    YAML
    db = File.join(@dir, "exe.db")
    stdout, stdout_w = IO.pipe
    pid = Process.spawn(RbConfig.ruby, PIPELINE_EXE, "run", d.file, "--db", db, "--progress", "0.2",
                        out: stdout_w, err: File.join(@dir, "exe.err"), pgroup: true)
    stdout_w.close
    progress = []
    reader = Thread.new { stdout.each_line { |l| progress << JSON.parse(l) } }
    wait_until(30, "events at the sink") { lines("s").size > 50 }
    Process.kill("TERM", pid)
    _, st = Process.wait2(pid)
    reader.join(5)
    err = File.read(File.join(@dir, "exe.err"))
    expect(st.exitstatus).to eq(130), err
    expect(err).to include("stopping: sources first, then draining (grace 5.0s)", ": STOPPED")
    # JSON lines when stdout is not a terminal, the last one STOPPED with the drained counts
    expect(progress.last["state"]).to eq("STOPPED")
    expect(progress.last["components"]["s"]["in"]).to eq(progress.last["components"]["a"]["out"])
    expect(progress.last["components"]["s"]["in"]).to eq(lines("s").size)
    expect(progress.map { |l| l["run"] }.uniq.size).to eq(1)
    out, = Open3.capture2(RbConfig.ruby, PIPELINE_EXE, "runs", "--db", db, "--json")
    runs = out.lines.map { |l| JSON.parse(l) }
    expect(runs.map { |r| r["status"] }).to eq(["STOPPED"])
    expect(runs[0]["counts"]["s"]["in"]).to eq(lines("s").size)
    expect_no_component_left
  end

  it "says which component never became healthy, with its last output, and exits 1" do
    d = pipeline(<<~YAML)
      sources: [#{comp('a', 'source')}]
      sinks: [{id: s, command: [#{RbConfig.ruby}, -e, '$stdout.sync = true; puts "loading"; warn "no such table"; exit 4']}]
    YAML
    _, err, st = Open3.capture3(RbConfig.ruby, PIPELINE_EXE, "run", d.file, "--no-db")
    expect(st.exitstatus).to eq(1)
    expect(err).to include(%(sink "s" (#{RbConfig.ruby} -e $stdout.sync = true; puts "loading"; warn "no such table"; exit 4): ) +
                           "exited (exited with status 4) before it registered; last output:\n    loading\n    no such table")
    expect_no_component_left
  end
end
