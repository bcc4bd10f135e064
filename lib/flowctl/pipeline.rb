# frozen_string_literal: true

require "flowctl"
require "flowctl/config"
require_relative "pipeline/definition"
require_relative "pipeline/run_store"
require_relative "pipeline/child"
require_relative "pipeline/router"
require_relative "pipeline/direct_input"
require_relative "pipeline/self_wired"
require_relative "pipeline/wire"
require_relative "pipeline/supervisor"
require_relative "pipeline/progress"
require_relative "pipeline/runner"

module Flowctl
  # flowctl-pipeline: runs a pipeline in flowctl's YAML format (docs/pipeline.md).
  # Loaded on demand: `require "flowctl/pipeline"`.
  module Pipeline
  end
end
